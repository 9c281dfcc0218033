import sys

from qwen_core.cli import main

sys.exit(main())
