"""`prinmix serve`: an OpenAI-compatible HTTP server for one base model and many delta tenants.

app.py (endpoints, load_app / create_app), config.py (ServerConfig, environment variables), scheduler.py
(the continuous-batching worker over the runtime's prefill / decode steps), sampling.py (per-request
token choice, through the runtime's token-choice hook), protocol.py (request and response shapes), chat.py (chat prompts),
text_stream.py (detokenization with stop strings), middleware.py (API key, body size limit),
runtime_loading.py (who may load a tenant from where), metrics.py (/metrics), the subcommand is
prinmix.cli.serve. Needs the `serve` extra (fastapi, uvicorn, prometheus_client); nothing is imported here, so
building the CLI's parser does not need it.
"""
