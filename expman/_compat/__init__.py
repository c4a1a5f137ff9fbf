"""Other trackers' verbs over expman: W&B style, SummaryWriter, the expman-core facade, TensorBoard files."""
