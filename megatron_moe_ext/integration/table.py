"""THE table: every replacement this package makes in Megatron (and torch, for Megatron's sake), and the seams it uses.

One row per replaced attribute. ``installer.install(groups)`` applies the rows of the named groups, and
nothing else in the package assigns to a Megatron attribute. ``installer.check`` (the canary, run by
the tests and at every start-up) verifies each row's target still exists in the installed
megatron-core and takes the parameters we rely on; a mismatch is one error naming the row.

Columns:
- ``name``: the row's id (errors, docs/integration.md, ``install(only=...)``).
- ``target``: ``module:attribute.path`` that is replaced.
- ``wrapper``: ``module:function`` that takes the original and returns the replacement (a string, so
  the table is data: the wrappers live in the files of this subpackage named after their concern).
- ``group``: when it is installed: ``cpu`` (by ``enable_cpu_runtime``, only without CUDA),
  ``model`` (every rank that runs a model: every entry, analysis and import too, and the test ranks),
  ``training`` (every rank of ``train``, ``launch`` and the patched script), ``script`` (only
  ``launch``, which runs an unmodified pretrain script and has no other way in).
- ``params``: parameter names of the target that the wrapper relies on (the canary's signature check).
- ``reason``: why it is replaced. ``seam``: what in Megatron would make the row unnecessary.
- ``checked``: megatron-core versions the row was verified against (by the test suite).

``SEAMS`` lists the Megatron extension points we use without replacing anything; the canary checks
them too, so a renamed seam fails at start-up with its name rather than deep inside a rank.
"""

from __future__ import annotations

import dataclasses

GROUPS = ("cpu", "model", "training", "script")
# 0.19.2: the test suite (CI). 0.20.0: Megatron-LM main d98e8a6 on PYTHONPATH, tests/unit/test_integration.py and
# the suites listed in docs/megatron-versions.md, by hand.
CHECKED = ("0.19.2", "0.20.0 (main d98e8a6)")


@dataclasses.dataclass(frozen=True)
class Replacement:
    """One replaced attribute (see the module docstring for the columns)."""

    name: str
    target: str
    wrapper: str
    group: str
    params: tuple[str, ...]
    reason: str
    seam: str
    checked: tuple[str, ...] = CHECKED


@dataclasses.dataclass(frozen=True)
class Seam:
    """A Megatron extension point we use as it is: ``target`` must exist with ``params``."""

    target: str
    params: tuple[str, ...]
    used_by: str


_CPU = "megatron_moe_ext.integration.cpu"
_OPTIM = "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer"

REPLACEMENTS: tuple[Replacement, ...] = (
    # --- cpu: megatron-core on CPU with gloo (runtime/cpu.py has the torch-level half) -------------------------
    Replacement(
        "cpu-all-to-all-splits", "torch.distributed:all_to_all_single", f"{_CPU}:wrap_all_to_all_single", "cpu",
        ("output", "input", "output_split_sizes", "input_split_sizes"),
        "the alltoall dispatcher converts its split sizes to lists only for CUDA tensors "
        "(moe_utils.maybe_move_tensor_to_cpu), so on CPU torch's binding gets tensors and rejects them",
        "maybe_move_tensor_to_cpu(as_numpy=True) converting CPU tensors too"),
    Replacement(
        "cpu-rng-get", "megatron.core.tensor_parallel.random:_get_cuda_rng_state", f"{_CPU}:wrap_get_rng_state", "cpu",
        ("device", "clone", "graph_safe"),
        "the CUDA RNG tracker reads the CUDA generator; on CPU the stream that init and dropout draw from is the "
        "CPU generator", "a device-agnostic RNG tracker"),
    Replacement(
        "cpu-rng-set", "megatron.core.tensor_parallel.random:_set_cuda_rng_state", f"{_CPU}:wrap_set_rng_state", "cpu",
        ("new_state", "device", "graph_safe"), "as cpu-rng-get", "a device-agnostic RNG tracker"),
    Replacement(
        "cpu-initialize", "megatron.training.training:initialize_megatron", f"{_CPU}:wrap_initialize_megatron", "cpu",
        ("allow_no_cuda",), "pretrain() calls initialize_megatron without allow_no_cuda, which asserts CUDA",
        "pretrain(allow_no_cuda=...) or a config field"),
    Replacement(
        "cpu-jit-fusion-training", "megatron.training.training:set_jit_fusion_options", f"{_CPU}:wrap_noop", "cpu",
        ("tp_size",), "warms fusions up on device='cuda' with nvfuser settings", "a --no-jit-warmup switch"),
    Replacement(
        "cpu-jit-fusion-initialize", "megatron.training.initialize:set_jit_fusion_options", f"{_CPU}:wrap_noop", "cpu",
        ("tp_size",), "as cpu-jit-fusion-training (the same function imported into initialize)",
        "a --no-jit-warmup switch"),
    Replacement(
        "cpu-compile-helpers", "megatron.core.datasets.utils:compile_helpers", f"{_CPU}:wrap_compile_helpers", "cpu",
        (), "runs make on dataset helpers that the wheel ships prebuilt without their Makefile: rank 0 would exit "
        "(a source checkout without built helpers gets one error naming the make command instead)",
        "skip compiling when helpers_cpp imports"),
    Replacement(
        "cpu-device-arch", "megatron.training.arguments:get_device_arch_version", f"{_CPU}:wrap_device_arch", "cpu",
        (), "validate_args asks the arch of cuda:0 under TP/CP > 1, which fails without a driver",
        "ask only when CUDA is available"),
    Replacement(
        "cpu-distopt-init", f"{_OPTIM}.__init__", f"{_CPU}:wrap_distopt_init", "cpu",
        ("optimizer", "config", "grad_scaler", "init_state_fn"),
        "without TE/apex, torch Adam's state built by init_state_fn lacks 'step', so a torch_dist resume asserts "
        "len(steps) == 1", "init_state_fn creating torch Adam's full state"),
    Replacement(
        "cpu-distopt-state-dict", f"{_OPTIM}.state_dict", f"{_CPU}:wrap_distopt_state_dict", "cpu", (),
        "at resume the checkpoint layout is built before any step, when torch Adam has no state",
        "init_state_fn called by state_dict() for torch optimizers too"),
    Replacement(
        "cpu-distopt-load", f"{_OPTIM}.load_state_dict", f"{_CPU}:wrap_distopt_load_state_dict", "cpu",
        ("state_dict",), "torch Adam's per-parameter 'step' comes back 0 and shared by all parameters",
        "per-parameter step restored from param_groups"),
    Replacement(
        "cpu-distopt-set-main", f"{_OPTIM}._set_main_param_and_optimizer_states", f"{_CPU}:wrap_no_grad", "cpu",
        ("model_param", "tensors"),
        "fp32 resume copies saved values into main params that are leaf views requiring grad (autograd forbids it)",
        "the copy under torch.no_grad() upstream"),
    # --- training: every rank of train, launch and the patched script --------------------------------------------
    Replacement(
        "upcycling", "megatron.core.transformer.moe.upcycling_utils:upcycle_state_dict",
        "megatron_moe_ext.integration.upcycling:wrap_upcycle_state_dict", "training", ("moe_model", "dense_model"),
        "_get_config accepts only SequentialMLP/TEGroupedMLP experts; ours (FineGrainedExperts) need their own "
        "dense -> expert conversion (other models go to Megatron's function unchanged)",
        "an experts-class hook for upcycling"),
    Replacement(
        "upcycling-load-keyword", "megatron.core.transformer.moe.upcycling_utils:load_and_upcycle_model",
        "megatron_moe_ext.integration.upcycling:wrap_load_and_upcycle_model", "training",
        ("load_dense_ckpt_func", "moe_model", "dense_model", "strict", "load_args", "load_kwargs"),
        "0.19 passes the dense model to load_checkpoint as model=, whose parameter is ddp_model",
        "the keyword fixed upstream"),
    Replacement(
        "peer-optimizer-groups", "megatron.training.training:get_megatron_optimizer_config",
        "megatron_moe_ext.integration.optimizer_groups:wrap_get_megatron_optimizer_config", "training", ("args",),
        "PEER tables train at their own lr/wd through Megatron's config_overrides, which megatron.training builds "
        "with no hook for extra entries", "extra config_overrides from the model config"),
    Replacement(
        "telemetry", "megatron.training.training:training_log",
        "megatron_moe_ext.integration.telemetry:wrap_training_log", "training",
        ("loss_dict", "iteration", "skipped_iter"),
        "a progress line (iteration, loss, tokens/s, time left) and, where NVML and a GPU are present, GPU "
        "memory/power/energy per token next to Megatron's line: training_log builds its line locally and offers "
        "no callback", "a training-log callback"),
    Replacement(
        "args-dump", "megatron.training.arguments:_print_args",
        "megatron_moe_ext.integration.args_dump:wrap_print_args", "training", ("title", "args"),
        "validate_args prints every argument (~850 lines) on rank 0 before training; rank 0 writes them to "
        "<save>/arguments.txt instead and prints where (MEGATRON_MOE_EXT_PRINT_ARGS=1 prints them)",
        "a switch for the argument dump (or a logger at debug level)"),
    Replacement(
        "balance-logging", "megatron.core.transformer.moe.moe_logging:MoEMetricsTracker.report",
        "megatron_moe_ext.integration.metrics_logging:wrap_report", "training", ("track_names",),
        "training_log reports the MoE tracker with a fixed track_names list; our balance losses and metrics would "
        "be dropped", "track_names taken from what was recorded, or a config field"),
    Replacement(
        "variable-experts-alltoall", "megatron.core.transformer.moe.token_dispatcher:"
        "MoEAlltoAllTokenDispatcher.preprocess", "megatron_moe_ext.integration.variable_routing:"
        "wrap_alltoall_preprocess", "model", ("routing_map",),
        "the dropless alltoall dispatch sizes its permutation as tokens x top-k, which is wrong for routers that "
        "give a token any number of experts (expert choice, ReLU, null experts); its capacity branch counts the map",
        "num_out_tokens counted from the routing map when the router says its rows vary", ("0.19.2",)),
    # --- script: `launch` runs an unmodified pretrain script ---------------------------------------------------------
    Replacement(
        "script-flags", "megatron.training.arguments:add_megatron_arguments",
        "megatron_moe_ext.integration.script_hooks:wrap_add_megatron_arguments", "script", ("parser",),
        "pretrain_gpt.py hard-codes its extra_args_provider (ModelOpt's or None): our flags need another way in",
        "a plugin entry point for argument providers"),
    Replacement(
        "script-validate", "megatron.training.arguments:validate_args",
        "megatron_moe_ext.integration.script_hooks:wrap_validate_args", "script", ("args", "defaults"),
        "our granularity derivation and checks must run between parsing and Megatron's validation, so its own "
        "checks see the derived --num-experts etc.", "a post-parse hook"),
    Replacement(
        "script-config-class", "megatron.training.argument_utils:core_transformer_config_from_args",
        "megatron_moe_ext.integration.script_hooks:wrap_core_transformer_config_from_args", "script",
        ("args", "config_class"), "the script builds a plain TransformerConfig, dropping our fields",
        "a config_class chosen by flag"),
    Replacement(
        "script-model-config", "megatron.training.argument_utils:gpt_config_from_args",
        "megatron_moe_ext.integration.script_hooks:wrap_gpt_config_from_args", "script",
        ("args", "config", "model_config_cls"),
        "the layer spec is selectable only through --spec, which cannot choose per-layer classes from config values",
        "a spec chosen by config (or --spec taking a callable with the config)"),
    Replacement(
        "script-eval-batch-choice", "megatron.training:pretrain",
        "megatron_moe_ext.integration.eval_batch_choice:wrap_pretrain", "script", ("forward_step_func",),
        "the evaluation log of expert-choice models reports the batch-choice loss next to the causal rule's "
        "(issue #22): the script's forward step knows nothing of it, and pretrain has no hook around the step",
        "a forward-step wrapper hook in pretrain (or extra eval passes)", ("0.19.2",)),
)

SEAMS: tuple[Seam, ...] = (
    Seam("megatron.training.arguments:parse_args", ("extra_args_provider",), "args.parse_megatron_args"),
    Seam("megatron.training.argument_utils:ArgumentGroupFactory.build_group", ("parser",), "args.add_ext_args"),
    Seam("megatron.training.models.gpt:GPTModelBuilder.build_model", ("pg_collection", "vp_stage"),
         "integration.model_config.MoEExtGPTModelBuilder"),
    Seam("megatron.core.models.gpt.gpt_layer_specs:get_gpt_decoder_block_spec",
         ("config", "use_transformer_engine", "normalization", "vp_stage"), "specs.local_gpt_block_spec"),
    Seam("megatron.core.transformer.moe.moe_layer:MoELayer.__init__", ("config", "submodules", "pg_collection"),
         "specs (experts and router slots of MoESubmodules)"),
    Seam("megatron.core.transformer.moe.router:TopKRouter.routing", ("logits",), "layers routers"),
    Seam("megatron.core.transformer.moe.moe_utils:MoEAuxLossAutoScaler.apply", (), "balancing.attach"),
    Seam("megatron.core.distributed.finalize_model_grads:finalize_model_grads", ("model", "num_tokens"),
         "balancing.bias_update (config.finalize_model_grads_func)"),
    Seam("megatron.core.dist_checkpointing.mapping:ShardedTensor.from_rank_offsets", ("key", "data"),
         "layers sharded_state_dict"),
    Seam("megatron.training.training:pretrain", ("train_valid_test_dataset_provider", "model_type",
                                                "forward_step_func"), "training.rank_entry"),
)


def rows(groups: tuple[str, ...] | list[str] | None = None) -> tuple[Replacement, ...]:
    """The rows of ``groups`` (all rows for None), in table order."""
    if groups is None:
        return REPLACEMENTS
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise ValueError(f"unknown integration group(s) {unknown}; choose from {', '.join(GROUPS)}")
    return tuple(r for r in REPLACEMENTS if r.group in groups)
