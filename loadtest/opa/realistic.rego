# OPA-Envoy policy equivalent to loadtest/policies/realistic/ (python -m loadtest.bench --peer).
# Decision path envoy/authz/allow (loadtest/opa/config.yaml). UNMEASURED here: no OPA
# binary on the machine the reference run was made on; written per the OPA-Envoy docs.
package envoy.authz

import rego.v1

default allow := false

# Same 20 rules as loadtest/rules.json (the extauthz and native setups are built from it).
rules := [
	{"method": "GET", "prefix": "/api/v1/res00/"},
	{"method": "POST", "prefix": "/api/v1/res01/"},
	{"method": "PUT", "prefix": "/api/v1/res02/"},
	{"method": "DELETE", "prefix": "/api/v1/res03/"},
	{"method": "GET", "prefix": "/api/v1/res04/"},
	{"method": "POST", "prefix": "/api/v1/res05/"},
	{"method": "PUT", "prefix": "/api/v1/res06/"},
	{"method": "DELETE", "prefix": "/api/v1/res07/"},
	{"method": "GET", "prefix": "/api/v1/res08/"},
	{"method": "POST", "prefix": "/api/v1/res09/"},
	{"method": "PUT", "prefix": "/api/v1/res10/"},
	{"method": "DELETE", "prefix": "/api/v1/res11/"},
	{"method": "GET", "prefix": "/api/v1/res12/"},
	{"method": "POST", "prefix": "/api/v1/res13/"},
	{"method": "PUT", "prefix": "/api/v1/res14/"},
	{"method": "DELETE", "prefix": "/api/v1/res15/"},
	{"method": "GET", "prefix": "/api/v1/res16/"},
	{"method": "POST", "prefix": "/api/v1/res17/"},
	{"method": "PUT", "prefix": "/api/v1/res18/"},
	{"method": "GET", "prefix": "/api/v1/res19/"},
]

http := input.attributes.request.http

# The mTLS peer as Envoy reports it (source.principal keeps the spiffe:// prefix).
principal_ok if startswith(input.attributes.source.principal, "spiffe://bench.local/ns/shop/")

bearer := t if {
	auth := http.headers.authorization
	startswith(auth, "Bearer ")
	t := substring(auth, 7, -1)
}

# RS256 only (the key type), issuer, audience and exp/nbf against the current time; the
# JWKS is written by the benchmark as data.bench.jwks (a JSON string).
claims := payload if {
	[valid, _, payload] := io.jwt.decode_verify(bearer, {
		"cert": data.bench.jwks,
		"iss": "https://idp.bench.local",
		"aud": "orders",
		"alg": "RS256",
	})
	valid
}

scope_ok if "orders.read" in claims.scope

path := split(http.path, "?")[0]

rule_ok if {
	some r in rules
	http.method == r.method
	startswith(path, r.prefix)
}

allow if {
	principal_ok
	scope_ok
	rule_ok
}
