"""The wire: how bytes cross between ranks, and the records that travel with them.

:mod:`~pipeschedule.wire.p2p` posts and waits on point-to-point operations, every wait bounded;
:mod:`~pipeschedule.wire.records` lays out the fixed-size records (headers, abort notices, call
records); :mod:`~pipeschedule.wire.framed` is the header protocol for variable shapes;
:mod:`~pipeschedule.wire.handshake` checks that neighbours were called alike;
:mod:`~pipeschedule.wire.notice` is the job's failure board on the store. A change to what goes on
the wire, or how a wait ends, goes here. Imports only :mod:`pipeschedule.errors`.
"""
