"""The HTTP server: OpenAI-shaped image API, SSE previews, metrics and the playground page."""
