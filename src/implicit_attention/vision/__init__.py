"""Images: the Fashion-MNIST composites with exact masks (:mod:`.composites`) and the two image
evaluations of explanations, segmentation and patch perturbation (:mod:`.evaluation`)."""
