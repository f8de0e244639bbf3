"""The InvokeAI adapter: the only code that imports `invokeai`.

Everything goes through the host's own services (its config, its SQLite model records, its
model installer and probe), never by writing its tables or files by hand.
"""
