"""WHAT is served: find the base model and adapters, validate them, build the demo."""
