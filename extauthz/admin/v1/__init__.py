"""Generated from protos/extauthz/admin/v1/admin.proto by grpcio-tools (``make protos``)."""
