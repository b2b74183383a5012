"""The model zoo: a tiny Llama base and task experts trained here, for tests, demos and benchmarks."""
