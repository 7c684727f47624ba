"""Backend protocol adapters: how a request is dispatched to one engine family's instances."""
