"""Serving and scale-out on Ray (the ``serve`` extra): ``cfdeploy serve`` (:mod:`.server`) and ``cfdeploy batch``
(:mod:`.batch`). :mod:`.protocol` is the HTTP API itself and needs no Ray."""
