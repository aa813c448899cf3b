"""Generated from protos/extauthz/decisionlog/v1/decision_log.proto by grpcio-tools
(``make protos``)."""
