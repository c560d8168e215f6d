"""Tables from result files, beside the paper's numbers: `python -m branchmerge.report --help`."""
