"""The method registry: every prefill pattern and decode selector, one registered class each."""
DENSE = "dense"   # the rule that reads everything: not a method, the absence of one
