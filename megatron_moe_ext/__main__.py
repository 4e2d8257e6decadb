import sys

from megatron_moe_ext.cli import main

sys.exit(main())
