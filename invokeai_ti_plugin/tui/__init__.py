"""The terminal form of the InvokeAI 2.3 manual (`invokeai-ti --gui`, and the launcher's
"textual inversion training"): fill in the options with the keyboard, then watch the run and
its result on the same screen."""

from .app import run_form

__all__ = ["run_form"]
