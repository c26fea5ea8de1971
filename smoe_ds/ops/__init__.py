"""Just-in-time built ops: DeepSpeed's and smoe-ds's own, built once up front."""
