"""Real servers started for the simulator, the benchmarks and the tests: PostgreSQL, HAProxy."""
