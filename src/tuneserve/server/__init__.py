"""HOW the world talks to it: the OpenAI-compatible API, health, metrics and the chat UI."""
