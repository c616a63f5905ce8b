"""Real servers the test suite starts itself: PostgreSQL, HAProxy (test infrastructure only)."""
