"""What the service and its clients both speak beside the generated protobuf code: proto <-> model
conversion and the same-host shared-memory segment handover. Imports ``kvstore.core`` and
``kvstore.v1`` only, so both ``kvstore.service`` and ``client`` build on it."""
