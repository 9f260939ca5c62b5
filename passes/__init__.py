"""FX graph passes of swpfx, one verb-named pass per module (each has tests/test_<pass>.py).

prepare:
- insert_skeletons: give every Conv2d a learnable filter skeleton

convert:
- fold_skeletons: merge each skeleton into its weight and zero the pruned stripes
- analyze_channels: find which conv output channels are coupled, pinned or free (analysis)
- remove_channels: remove channels across the graph, folding what they contributed
- lower_stripe_convs: rewrite stripe-pruned convs into cheaper standard-op subgraphs

analyses:
- count_costs: FLOPs, parameters and memory per node
- measure_channel_similarity: feature-map similarity for Central Filter

graph_utils holds the small helpers they share.
"""
