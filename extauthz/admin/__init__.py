"""The admin gRPC service (``extauthz.admin.v1.Admin``): explain decisions, policy status.

Served on its own listener (``--admin-listen``), never on the port Envoy calls.
"""
