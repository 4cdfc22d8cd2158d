"""HOW tokens are made. Knows nothing of HTTP; imports only tuneserve.models."""
