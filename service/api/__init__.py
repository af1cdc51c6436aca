"""HTTP: the app factory and routes, wire types, the one error map, method rules, metrics."""
