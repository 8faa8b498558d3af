"""The policy: who may do which action to which capsule (see design brief, "Policy model").

    actions.py     the polkit action ids, defined once
    engine.py      the pure decision: (identity, request, config) -> Decision, no I/O
    config.py      /etc/capsuled read safely and checked against the schema
    identity.py    the caller's user name and groups, read from NSS
    accounts.py    identity.py's answers kept: 1 s at most, dropped when the files change
    builtin.py     the last step from the config's rules     } one of the two, chosen
    polkit.py      the last step from polkitd over D-Bus     } by [policy] backend
    authorizer.py  the one decision function, in order: root, liveness, grants, backend

Importing this package starts nothing and loads none of them.
"""
