"""Ten hostile-peer attacks against a real relay process, and whether it holds like tor.

``python -m benchmarks.attacks [--quick] [--json] [--only NAME,...]`` (:mod:`.run`). Each
attack starts its own ``python -m examples.relay`` processes on loopback (in a private network
namespace when permitted), plays the hostile peer with :class:`benchmarks.rawpeer.RawPeer`
(blocking TLS, Tor cells written by hand, the reference crypto), measures, and stops every
process it started. Modules: :mod:`.harness` (relay processes, /proc figures, results),
:mod:`.services` (loopback targets and a fake next relay), :mod:`.circuit` (hand-built
circuits), :mod:`.flood` (CREATE floods), and the rows in :mod:`.policy_rows` (refusals),
:mod:`.memory_rows` (memory and descriptors) and :mod:`.load_rows` (latency and CPU).
"""
