"""Small helpers with no heavy imports (the merge engine must start fast)."""
