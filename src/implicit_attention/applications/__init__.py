"""Applications of the explanations: explanations that make models better (issue 15).

- :mod:`.amplify`: AMPLIFY (Krishna et al. 2023): a proxy model's explanations as in-context rationales
  in the few-shot prompt of a target causal LM.
"""
