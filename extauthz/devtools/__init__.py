"""Development helpers: a dev CA, a dev IdP, an echo upstream, Envoy launching, the demo mesh.

Nothing here is for production. The tests and ``extauthz demo`` share it, so the demo shows
exactly what the integration tests prove.
"""
