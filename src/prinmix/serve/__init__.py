"""`prinmix serve`: an OpenAI-compatible HTTP server for one base model and many delta tenants.

app.py (endpoints, load_app / create_app), scheduler.py (the continuous-batching worker), protocol.py
(request and response shapes), chat.py (chat prompts), text_stream.py (detokenization with stop
strings); the subcommand is prinmix.cli.serve. Needs the `serve` extra (fastapi, uvicorn); nothing is
imported here, so building the CLI's parser does not need it.
"""
