"""Model families: each serves a kind of model behind the one `Separator` contract."""
