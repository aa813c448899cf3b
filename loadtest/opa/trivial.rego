# OPA-Envoy policy equivalent to loadtest/policies/trivial/ (python -m loadtest.bench --peer).
# UNMEASURED here: no OPA binary on the reference machine; written per the OPA-Envoy docs.
package envoy.authz

import rego.v1

default allow := false

allow if input.attributes.request.http.method == "GET"
