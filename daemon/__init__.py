"""The process around the stream: the CLI, settings, logging, metrics, the HTTP gateway, reports and benchmarks."""
