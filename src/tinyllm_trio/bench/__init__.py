"""The benchmarks (`tinyllm-trio bench model|engine|http`) and the HTTP client they drive.

Nothing in the server imports this package: it sits on top of the layers it measures
(`model/` for `bench model`, the Engine for `bench engine`, a live server for `bench http`).
"""
