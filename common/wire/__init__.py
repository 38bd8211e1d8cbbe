"""What the server and the workers say to each other: the protocol's vocabulary, tensor codecs,
chunks, gRPC options, credentials, failure words. Imports ``core`` and ``job`` (the protocol
maps ``JobConfig``), never the server or the worker."""
