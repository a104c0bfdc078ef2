"""Delivery: results go back to the destinations, with retries and dead letters."""
