"""The engine worker's HTTP server: OpenAI and SGLang-native APIs, Prometheus metrics, KV events.

``app.create_app`` builds the aiohttp application around a loaded ``LLMEngine``; ``cli`` is the
``prefixgate engine`` command.
"""
