"""The model: the correlation mixer, component language models, ensembles and their merger.

Needs torch. `correlation` is the token mixer, `component` the GPT-style member
model, `ensemble` the members with their correlation merger; `checkpoint` and
`loading` save and rebuild model folders; `flops` counts a step's work.
"""
