"""The toy world: a miniature of the paper's setting that runs on 2 CPU cores.

Three domains whose answers a program can check (math word problems, "what does this program
print", multiple-choice quantitative science), an oracle teacher that writes R1-style traces, a
verifier per domain, a locally trained byte-level BPE tokenizer, and Qwen2 model sizes (conf/model/).
"""

from branchmerge.toy.domains import DOMAINS, Domain, Problem, get_domain

__all__ = ["DOMAINS", "Domain", "Problem", "get_domain"]
