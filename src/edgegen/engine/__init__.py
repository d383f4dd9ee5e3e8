"""Scheduling over executors: queues, batching, deadlines and backpressure. No protocol knowledge."""
