"""Test support: processes, brokers, roles and waits shared by the tests."""
