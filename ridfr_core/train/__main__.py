"""``python -m ridfr_core.train`` (also under ``accelerate launch -m ridfr_core.train``)."""

import signal
import sys

from .cli import main, stop_on_sigterm

signal.signal(signal.SIGTERM, stop_on_sigterm)
sys.exit(main())
