"""invokeai-ti-plugin: textual-inversion training for InvokeAI."""

__version__ = "0.1.0"
