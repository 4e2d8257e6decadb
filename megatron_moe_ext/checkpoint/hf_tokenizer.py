"""The tokenizer files of an exported model.

Megatron records the tokenizer in the run's arguments. Two cases are known exactly:

- ``NullTokenizer`` (what ``megatron-moe-ext train`` uses on its built-in corpora and on raw text files): one
  token per UTF-8 byte, id = byte value, end of document = ``vocab_size - 1`` (256). Written as a byte-level
  ``tokenizer.json`` (a BPE vocabulary of the 256 byte symbols and no merges, so every byte stays one token)
  that ``AutoTokenizer`` loads with no remote code;
- ``HuggingFaceTokenizer`` whose ``--tokenizer-model`` is a local folder: its files are copied.

Anything else needs ``--tokenizer DIR`` (a Hugging Face tokenizer folder to copy). No tokenizers/transformers
import: the JSON is written by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

EOS_TOKEN = "<|endoftext|>"
# Files of a Hugging Face tokenizer folder worth copying (whichever exist).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                    "merges.txt", "tokenizer.model", "vocab.txt", "added_tokens.json", "chat_template.jinja")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte (what the ByteLevel pre-tokenizer and decoder use)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def byte_tokenizer_json(eos_id: int) -> dict:
    """``tokenizer.json`` of the byte tokeniser: byte b -> id b, ``EOS_TOKEN`` -> ``eos_id``."""
    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": eos_id, "content": EOS_TOKEN, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}],
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": None,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": []},
    }


def tokenizer_source(args: argparse.Namespace, override: str | None) -> tuple[str, str | None]:
    """('bytes', None) or ('copy', folder) for this run; ValueError naming the fix when neither applies.
    Called before any work starts."""
    if override is not None:
        if not os.path.isfile(os.path.join(override, "tokenizer_config.json")):
            raise ValueError(f"--tokenizer {override!r} has no tokenizer_config.json; fix: pass a Hugging Face "
                             f"tokenizer folder (what AutoTokenizer.save_pretrained writes)")
        return "copy", override
    kind = getattr(args, "tokenizer_type", None)
    if kind == "NullTokenizer":
        return "bytes", None
    model = getattr(args, "tokenizer_model", None)
    if kind == "HuggingFaceTokenizer" and model and os.path.isfile(os.path.join(model, "tokenizer_config.json")):
        return "copy", model
    raise ValueError(f"the run's tokenizer ({kind}, --tokenizer-model {model!r}) is not a local Hugging Face "
                     f"tokenizer folder; fix: pass --tokenizer DIR with the Hugging Face tokenizer the model was "
                     f"trained with")


def eos_token_id(args: argparse.Namespace) -> int | None:
    """The end-of-document id Megatron used (NullTokenizer: ``vocab_size - 1`` unless set)."""
    if getattr(args, "tokenizer_type", None) == "NullTokenizer":
        eod = getattr(args, "null_tokenizer_eod_id", None)
        return int(eod) if eod is not None else int(args.vocab_size) - 1
    return None


def write_tokenizer(folder: str, source: tuple[str, str | None], args: argparse.Namespace) -> None:
    """Tokenizer files into ``folder`` (see :func:`tokenizer_source`)."""
    kind, path = source
    if kind == "copy":
        for name in _TOKENIZER_FILES:
            if os.path.isfile(os.path.join(path, name)):
                shutil.copyfile(os.path.join(path, name), os.path.join(folder, name))
        return
    eos = eos_token_id(args)
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        json.dump(byte_tokenizer_json(eos), f, ensure_ascii=False)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS_TOKEN, "bos_token": None,
              "unk_token": None, "pad_token": None, "model_max_length": int(args.seq_length),
              "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump({"eos_token": EOS_TOKEN}, f, indent=2)
