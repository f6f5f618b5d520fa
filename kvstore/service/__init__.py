"""The gRPC service over one engine. ``server.py`` (``KVStoreServer``) is the entry point and its
docstring maps the modules; ``config.py`` holds ``ServerConfig`` and the ``ServiceLayout`` the
server runs on. Nothing is re-exported here: importing ``kvstore.service.auth`` or
``kvstore.service.config`` (as ``kvstore.config`` does) must not load the server, the engine and
grpc with it."""
