"""chat-worker: a RabbitMQ worker for OpenAI-compatible chat completions."""

__version__ = "0.1.0"
