// Scenario.cs: the libtether scenario in C# (see scripts/test-clients and examples/c/scenario.c): alice and bob,
// each with a primary and a backup server, see each other, talk, survive the primary's SIGSTOP by failing over,
// and close cleanly. Bob's events are pulled the edge-triggered way, woken by SetWakeup, to exercise the
// callback; alice's by waiting in NextEvent. Exits 0 when every step held; otherwise prints the step that failed
// and exits 1.
using System;
using System.Diagnostics;
using System.Threading;
using Tether;

static class Scenario
{
    static string primary, backup;
    static readonly Stopwatch clock = Stopwatch.StartNew();
    static readonly AutoResetEvent bobWoken = new AutoResetEvent(false);
    static int bobWakeups;

    static long NowMs() { return clock.ElapsedMilliseconds; }

    static void Fail(string what)
    {
        Console.Error.WriteLine("csharp scenario FAILED: " + what);
        Environment.Exit(1);
    }

    static TetherClient Start(string id)
    {
        using (var cfg = new TetherConfig(id))
        {
            cfg.AddServer(primary).AddServer(backup).SetHeartbeat(500)
               .SetReconnect(100, 2000, 0, 0); // reconnect after 100 ms at first; stay on the backup once there
            return TetherClient.Start(cfg);
        }
    }

    // Pull `who`'s events until one of `kind` matches (peer, state and data, when given), within `ms`. With
    // `woken`, wait for the wake-up callback and read with timeout 0 until nothing is left (edge-triggered).
    static TetherEvent WaitFor(TetherClient c, string who, EventKind kind, string peer, PresenceState state,
                               string data, long ms, AutoResetEvent woken = null)
    {
        long deadline = NowMs() + ms;
        for (;;)
        {
            long left = deadline - NowMs();
            if (left <= 0) Fail(string.Format("{0}: no event {1} (peer {2}) within {3} ms", who, kind, peer ?? "-", ms));
            TetherEvent ev = c.NextEvent(woken == null ? (int)left : 0);
            if (c.Ended) Fail(who + ": the client ended while waiting for " + kind);
            if (ev == null)
            {
                if (woken != null) woken.WaitOne((int)left);
                continue;
            }
            if (ev.Kind == EventKind.Disconnected)
                Console.WriteLine("{0}: disconnected from {1}: {2} (by server: {3})", who, ev.Server, ev.Reason, ev.Flag ? 1 : 0);
            if (ev.Kind == EventKind.Connected) Console.WriteLine("{0}: connected to {1}", who, ev.Server);
            if (ev.Kind != kind) continue;
            if (peer != null && ev.Peer != peer) continue;
            if (state != PresenceState.None && ev.State != state) continue;
            if (data != null && ev.DataText != data) continue;
            return ev;
        }
    }

    static void Talk(TetherClient alice, TetherClient bob, string round)
    {
        string a = "hello bob (" + round + ")", b = "hello alice (" + round + ")";
        alice.Send("bob", a);
        WaitFor(bob, "bob", EventKind.Data, "alice", PresenceState.None, a, 5000, bobWoken);
        bob.Send("alice", b);
        WaitFor(alice, "alice", EventKind.Data, "bob", PresenceState.None, b, 5000);
        Console.WriteLine("exchanged messages ({0})", round);
    }

    static void ExpectClosedError(Action call, string what)
    {
        try { call(); }
        catch (TetherException e)
        {
            if (e.Status == Status.ErrClosed) return;
            Fail(what + ": " + e.Message + ", not TETHER_ERR_CLOSED");
        }
        Fail(what + " was not refused");
    }

    static void CloseClient(TetherClient c, string who)
    {
        if (!c.Close(3000)) Fail(who + ": tether_close timed out");
        ExpectClosedError(() => c.Close(3000), who + ": a second close");
        ExpectClosedError(() => c.Send("x", new byte[] { (byte)'x' }), who + ": a send after close");
        bool sawBye = false;
        TetherEvent ev;
        while ((ev = c.NextEvent(3000)) != null)
            if (ev.Kind == EventKind.Disconnected && ev.Reason == "bye") sawBye = true;
        if (!c.Ended) Fail(who + ": events did not end with TETHER_CLOSED");
        if (!sawBye) Fail(who + ": no disconnected(bye) after close");
        c.Dispose();
    }

    static void StopPrimary(string pid)
    {
        using (var kill = Process.Start(new ProcessStartInfo("kill", "-STOP " + pid) { UseShellExecute = false }))
        {
            if (!kill.WaitForExit(5000) || kill.ExitCode != 0) Fail("SIGSTOP the primary (pid " + pid + ")");
        }
    }

    static int Main()
    {
        primary = Environment.GetEnvironmentVariable("TETHER_PRIMARY");
        backup = Environment.GetEnvironmentVariable("TETHER_BACKUP");
        string pid = Environment.GetEnvironmentVariable("TETHER_PRIMARY_PID");
        if (primary == null || backup == null || pid == null)
            Fail("TETHER_PRIMARY, TETHER_BACKUP and TETHER_PRIMARY_PID must be set");
        try
        {
            Console.WriteLine("libtether {0}", Library.Version);

            // 1. Connect to the primary, with a backup configured.
            TetherClient alice = Start("alice"), bob = Start("bob");
            bob.SetWakeup(() => { Interlocked.Increment(ref bobWakeups); bobWoken.Set(); });
            TetherEvent ev = WaitFor(alice, "alice", EventKind.Connected, null, PresenceState.None, null, 5000);
            if (ev.Server != primary || !ev.Flag) Fail("alice connected to " + ev.Server + ", not the primary");
            uint timeoutMs = ev.TimeoutMs;
            WaitFor(bob, "bob", EventKind.Connected, null, PresenceState.None, null, 5000, bobWoken);

            // 2. Subscribe to the peer and see it online.
            alice.Subscribe("bob");
            WaitFor(alice, "alice", EventKind.Presence, "bob", PresenceState.Online, null, 5000);
            Console.WriteLine("alice sees bob online");

            // 3. Exchange messages.
            Talk(alice, bob, "primary");

            // 4. Stop the primary: the death is the client's heartbeat verdict, and both move to the backup.
            StopPrimary(pid);
            long stoppedAt = NowMs(), bound = timeoutMs + 2000;
            ev = WaitFor(alice, "alice", EventKind.Disconnected, null, PresenceState.None, null, bound);
            if (ev.Reason != "heartbeat_timeout" || ev.Flag || ev.Server != primary)
                Fail(string.Format("alice: disconnected with {0} (by server: {1}) from {2}", ev.Reason, ev.Flag, ev.Server));
            ev = WaitFor(alice, "alice", EventKind.Connected, null, PresenceState.None, null, bound - (NowMs() - stoppedAt));
            if (ev.Server != backup || ev.Flag) Fail("alice reconnected to " + ev.Server + ", not the backup");
            Console.WriteLine("alice failed over to the backup {0} ms after the SIGSTOP (bound {1} ms)",
                              NowMs() - stoppedAt, bound);
            WaitFor(alice, "alice", EventKind.Presence, "bob", PresenceState.Online, null, 5000);
            Console.WriteLine("alice sees bob online on the backup");
            Talk(alice, bob, "backup");

            // 5. Close cleanly.
            CloseClient(alice, "alice");
            CloseClient(bob, "bob");
            if (Volatile.Read(ref bobWakeups) == 0) Fail("bob's wake-up callback never ran");
            Console.WriteLine("bob was woken {0} times", Volatile.Read(ref bobWakeups));
        }
        catch (TetherException e)
        {
            Fail(e.Message);
        }
        Console.WriteLine("csharp scenario passed");
        return 0;
    }
}
