// Tether.cs: the C# (Mono / .NET) binding of libtether, the tether client behind the C ABI of
// crates/tether-ffi/tether.h. Every function of the header is here, behind TetherConfig (the settings),
// TetherClient (a running client), TetherEvent (one event, copied out of the library at once) and
// TetherException (a negative status with tether_last_error's words). libtether.so is loaded by the name
// "tether": put its directory on LD_LIBRARY_PATH (or next to the program).
using System;
using System.Collections.Concurrent;
using System.Reflection;
using System.Runtime.InteropServices;
using System.Text;
using System.Threading;

namespace Tether
{
    /// <summary>A status returned by every libtether call (TETHER_OK, TETHER_TIMEOUT, ... TETHER_ERR_*).</summary>
    public enum Status
    {
        Ok = 0,
        Timeout = 1,
        Closed = 2,
        ErrNull = -1,
        ErrUtf8 = -2,
        ErrInvalid = -3,
        ErrTooLarge = -4,
        ErrFull = -5,
        ErrClosed = -6,
        ErrTls = -7,
        ErrThread = -8,
        ErrInternal = -9,
    }

    /// <summary>TETHER_EVENT_*: what a TetherEvent says (see the header for the fields each kind fills).</summary>
    public enum EventKind
    {
        Connected = 1,
        Disconnected = 2,
        Reconnecting = 3,
        ConnectFailed = 4,
        GaveUp = 5,
        Data = 6,
        Presence = 7,
        Undeliverable = 8,
        NotSent = 9,
        Suspect = 10,
        Recovered = 11,
        Acked = 12,
        Delivered = 13,
        NotDelivered = 14,
        InDoubt = 15,
        Dropped = 16,
        Diagnosis = 17,
        Heartbeat = 18,
    }

    /// <summary>The state of a Presence event (None for every other kind).</summary>
    public enum PresenceState
    {
        None = 0,
        Online = 1,
        Suspect = 2,
        Offline = 3,
    }

    /// <summary>A libtether call failed: Status is its TETHER_ERR_*, Detail what tether_last_error() said.</summary>
    public class TetherException : Exception
    {
        public Status Status { get; private set; }
        public int Code { get { return (int)Status; } }
        public string Detail { get; private set; }

        public TetherException(string operation, Status status, string detail)
            : base(string.Format("{0}: {1}{2}", operation, Library.StatusText(status),
                                 string.IsNullOrEmpty(detail) ? "" : " (" + detail + ")"))
        {
            Status = status;
            Detail = detail;
        }
    }

    /// <summary>The library as a whole: its version and the names of statuses.</summary>
    public static class Library
    {
        /// <summary>tether_version(), e.g. "0.1.0".</summary>
        public static string Version { get { return Native.FromUtf8(Native.tether_version()); } }

        /// <summary>tether_status_text(): a status in words, e.g. "queue full" for ErrFull.</summary>
        public static string StatusText(Status status) { return Native.FromUtf8(Native.tether_status_text((int)status)); }

        /// <summary>tether_last_error(): the words of the last failing call on this thread ("" if none).
        /// TetherException already carries them; this is for completeness.</summary>
        public static string LastError { get { return Native.FromUtf8(Native.tether_last_error()); } }
    }

    /// <summary>
    /// One event, every field copied out of the library (so it stays valid after the next NextEvent). Which
    /// fields mean something depends on Kind (see TETHER_EVENT_* in tether.h); the others are 0, "" or empty.
    /// </summary>
    public sealed class TetherEvent
    {
        /// <summary>LastSeenMs when the server does not know.</summary>
        public const uint Unknown = uint.MaxValue;

        public EventKind Kind { get; internal set; }
        /// <summary>flag: Connected: to the primary; Disconnected: the server ended it; Presence: the peer ended
        /// its connection itself; InDoubt: the message was sent and never acknowledged.</summary>
        public bool Flag { get; internal set; }
        public PresenceState State { get; internal set; }
        public uint Attempt { get; internal set; }
        public uint HeartbeatMs { get; internal set; }
        public uint TimeoutMs { get; internal set; }
        public uint RetryAfterMs { get; internal set; }
        public uint DelayMs { get; internal set; }
        public uint SilentMs { get; internal set; }
        public uint LastSeenMs { get; internal set; }
        public ulong Epoch { get; internal set; }
        public ulong Seq { get; internal set; }
        public ulong ResentAs { get; internal set; }
        public ulong Count { get; internal set; }
        public string Server { get; internal set; }
        public string Peer { get; internal set; }
        public string Reason { get; internal set; }
        public string Alternative { get; internal set; }
        public string Text { get; internal set; }
        /// <summary>The payload (Data, InDoubt); empty, never null, when there is none.</summary>
        public byte[] Data { get; internal set; }
        /// <summary>len: the payload's length, or for NotSent the length of the message not sent (whose bytes
        /// the library does not hand back, so Data is empty there).</summary>
        public ulong Length { get; internal set; }
        /// <summary>Sequence numbers (Delivered, NotDelivered); empty, never null, when there are none.</summary>
        public ulong[] Seqs { get; internal set; }

        /// <summary>Data decoded as UTF-8.</summary>
        public string DataText { get { return Encoding.UTF8.GetString(Data); } }

        public override string ToString()
        {
            var s = new StringBuilder(Kind.ToString());
            Action<string, object> add = (name, v) => s.Append(' ').Append(name).Append('=').Append(v);
            if (Server != "") add("server", Server);
            if (Peer != "") add("peer", Peer);
            if (State != PresenceState.None) add("state", State);
            if (Reason != "") add("reason", Reason);
            if (Flag) add("flag", 1);
            if (Length != 0) add("len", Length);
            if (Seq != 0) add("seq", Seq);
            if (Count != 0) add("count", Count);
            if (Seqs.Length != 0) add("seqs", string.Join(",", Seqs));
            if (Text != "") add("text", Text);
            return s.ToString();
        }
    }

    /// <summary>
    /// A client's settings (tether_config), built fluently:
    /// <code>new TetherConfig("alice").AddServer("10.0.0.1:7400").AddServer("10.0.0.2:7400").SetHeartbeat(500)</code>.
    /// A client started from it keeps its own copy. Not for use by two threads at the same time. Dispose frees it.
    /// </summary>
    public sealed class TetherConfig : IDisposable
    {
        internal readonly ConfigHandle Handle;

        /// <summary>tether_config_new: the library's defaults for client id <paramref name="clientId"/>.</summary>
        public TetherConfig(string clientId)
        {
            Native.Check(Native.tether_config_new(Native.ToUtf8(clientId), out Handle), "tether_config_new");
        }

        /// <summary>tether_config_add_server: "host:port"; the first is the primary, the others backups.</summary>
        public TetherConfig AddServer(string hostPort)
        {
            Native.Check(Native.tether_config_add_server(Handle, Native.ToUtf8(hostPort)), "tether_config_add_server");
            return this;
        }

        /// <summary>tether_config_set_token: the credential sent in HELLO (null: none).</summary>
        public TetherConfig SetToken(string token)
        {
            Native.Check(Native.tether_config_set_token(Handle, Native.ToUtf8(token)), "tether_config_set_token");
            return this;
        }

        /// <summary>tether_config_set_heartbeat: ask for a heartbeat every intervalMs (0: the server's default).</summary>
        public TetherConfig SetHeartbeat(uint intervalMs)
        {
            Native.Check(Native.tether_config_set_heartbeat(Handle, intervalMs), "tether_config_set_heartbeat");
            return this;
        }

        /// <summary>tether_config_set_tls: connect with TLS; caFile null trusts the system's store, serverName null
        /// checks the host each server was given as.</summary>
        public TetherConfig SetTls(string caFile = null, string serverName = null)
        {
            Native.Check(Native.tether_config_set_tls(Handle, Native.ToUtf8(caFile), Native.ToUtf8(serverName)),
                         "tether_config_set_tls");
            return this;
        }

        /// <summary>tether_config_set_reconnect: backoff from initialMs doubling up to maxMs, give up after
        /// maxAttempts failures (0: never), try the primary every returnToPrimaryMs while on a backup (0: never).</summary>
        public TetherConfig SetReconnect(uint initialMs, uint maxMs, uint maxAttempts, uint returnToPrimaryMs)
        {
            Native.Check(Native.tether_config_set_reconnect(Handle, initialMs, maxMs, maxAttempts, returnToPrimaryMs),
                         "tether_config_set_reconnect");
            return this;
        }

        /// <summary>tether_config_set_queues: sends held while disconnected (0 refuses them), events that may wait
        /// for the application (at least 1; beyond, they are dropped and a Dropped event counts them).</summary>
        public TetherConfig SetQueues(uint heldSends, uint maxEvents)
        {
            Native.Check(Native.tether_config_set_queues(Handle, heldSends, maxEvents), "tether_config_set_queues");
            return this;
        }

        /// <summary>tether_config_set_reliable: a reliable session with at most window unacknowledged messages
        /// (0: the default), with delivery receipts when asked.</summary>
        public TetherConfig SetReliable(uint window = 0, bool receipts = false)
        {
            Native.Check(Native.tether_config_set_reliable(Handle, window, receipts ? 1 : 0), "tether_config_set_reliable");
            return this;
        }

        /// <summary>tether_config_set_adaptive_heartbeat: learn the longest heartbeat the path's NATs allow,
        /// between floorMs and ceilingMs, marginPercent below the shortest silence the path failed.</summary>
        public TetherConfig SetAdaptiveHeartbeat(uint floorMs, uint ceilingMs, uint marginPercent = 10)
        {
            Native.Check(Native.tether_config_set_adaptive_heartbeat(Handle, floorMs, ceilingMs, marginPercent),
                "tether_config_set_adaptive_heartbeat");
            return this;
        }

        /// <summary>tether_config_free.</summary>
        public void Dispose() { Handle.Dispose(); }
    }

    /// <summary>
    /// A running client (tether_client): it connects and reconnects in the background; NextEvent tells what
    /// happens. Send, Subscribe and Unsubscribe may be called from several threads at once; events are pulled by
    /// one thread at a time. Close says goodbye; Dispose frees (closing first, without waiting, if needed).
    /// </summary>
    public sealed class TetherClient : IDisposable
    {
        readonly ClientHandle handle;
        readonly object eventLock = new object();
        volatile bool ended;
        int closeCalled;

        TetherClient(ClientHandle h) { handle = h; }

        /// <summary>tether_client_start: start a client from cfg (which needs at least one server).</summary>
        public static TetherClient Start(TetherConfig cfg)
        {
            if (cfg == null) throw new ArgumentNullException("cfg");
            ClientHandle h;
            Native.Check(Native.tether_client_start(cfg.Handle, out h), "tether_client_start");
            return new TetherClient(h);
        }

        /// <summary>True once NextEvent has seen TETHER_CLOSED: the client is closed (or gave up) and every event
        /// was taken; nothing more will come.</summary>
        public bool Ended { get { return ended; } }

        /// <summary>tether_send: send data to client <paramref name="to"/> (null or "": the server's
        /// application). Returns the reliable sequence number, or 0 when the session is not reliable.</summary>
        public ulong Send(string to, byte[] data)
        {
            if (data == null) throw new ArgumentNullException("data");
            return Send(to, data, 0, data.Length);
        }

        /// <summary>tether_send of data[offset .. offset+count].</summary>
        public ulong Send(string to, byte[] data, int offset, int count)
        {
            if (data == null) throw new ArgumentNullException("data");
            if (offset < 0 || count < 0 || offset > data.Length - count) throw new ArgumentOutOfRangeException("count");
            byte[] toz = Native.ToUtf8(to);
            ulong seq;
            int rc;
            GCHandle pin = GCHandle.Alloc(data, GCHandleType.Pinned);
            try
            {
                IntPtr p = count == 0 ? IntPtr.Zero : pin.AddrOfPinnedObject() + offset;
                rc = Native.tether_send(handle, toz, p, (UIntPtr)(uint)count, out seq);
            }
            finally { pin.Free(); }
            Native.Check(rc, "tether_send");
            return seq;
        }

        /// <summary>tether_send of text encoded as UTF-8.</summary>
        public ulong Send(string to, string text) { return Send(to, Native.Strict.GetBytes(text)); }

        /// <summary>tether_subscribe: follow the presence of client id ("*": everyone, where the server allows it).</summary>
        public void Subscribe(string id)
        {
            Native.Check(Native.tether_subscribe(handle, Native.ToUtf8(id)), "tether_subscribe");
        }

        /// <summary>tether_unsubscribe: stop following the presence of id.</summary>
        public void Unsubscribe(string id)
        {
            Native.Check(Native.tether_unsubscribe(handle, Native.ToUtf8(id)), "tether_unsubscribe");
        }

        /// <summary>
        /// tether_set_wakeup: call <paramref name="callback"/> (null: none) when an event becomes available and
        /// none was waiting (edge-triggered: then read with NextEvent(0) until it returns null), and once when the
        /// client has ended. It runs on the library's thread (or at once on this one if events are waiting): it
        /// must return quickly and must not call into the library, only post to the application's own loop.
        /// </summary>
        public void SetWakeup(Action callback)
        {
            long key = handle.Key;
            if (callback != null) Wakeups.Table[key] = callback;
            int rc;
            Wakeups.Registering = true; // a call at once comes on this thread, not the library's
            try { rc = Native.tether_set_wakeup(handle, callback == null ? IntPtr.Zero : Wakeups.Thunk, (IntPtr)key); }
            finally { Wakeups.Registering = false; }
            if (callback == null || rc != 0)
            {
                Action gone;
                Wakeups.Table.TryRemove(key, out gone);
            }
            Native.Check(rc, "tether_set_wakeup");
        }

        /// <summary>
        /// tether_next_event: wait up to timeoutMs (0: do not wait; -1: for ever) for the next event. True with
        /// the event; false on a timeout, or once the client has ended (then Ended is true), which includes once it
        /// was disposed (so a thread pulling events while another disposes the client sees the end).
        /// </summary>
        public bool TryNextEvent(int timeoutMs, out TetherEvent ev)
        {
            ev = null;
            if (ended) return false;
            // The pointers in raw are valid only until the next call and until tether_free: copy them before another
            // thread pulls (the lock) and before a Dispose on another thread frees the client (the reference taken
            // on the handle, which defers the free until it is released).
            lock (eventLock)
            {
                bool added = false;
                try
                {
                    if (!handle.IsClosed) handle.DangerousAddRef(ref added);
                }
                catch (ObjectDisposedException) { }
                if (!added) { ended = true; return false; } // disposed: for this thread, the end
                try
                {
                    var raw = new Native.tether_event(); // on the stack: the GC does not move it during the wait
                    int rc = Native.tether_next_event(handle.DangerousGetHandle(), timeoutMs, ref raw);
                    if (rc == (int)Status.Timeout) return false;
                    if (rc == (int)Status.Closed) { ended = true; return false; }
                    Native.Check(rc, "tether_next_event");
                    ev = Native.Copy(ref raw);
                    return true;
                }
                finally { handle.DangerousRelease(); }
            }
        }

        /// <summary>The next event within timeoutMs, or null on a timeout or once the client has ended (Ended).</summary>
        public TetherEvent NextEvent(int timeoutMs)
        {
            TetherEvent ev;
            return TryNextEvent(timeoutMs, out ev) ? ev : null;
        }

        /// <summary>
        /// tether_close: say goodbye and stop reconnecting, waiting up to timeoutMs. True when the goodbye is done,
        /// false when it goes on in the background. The remaining events (the last Disconnected among them) can
        /// still be pulled until Ended. A second Close throws TetherException(ErrClosed).
        /// </summary>
        public bool Close(uint timeoutMs)
        {
            Interlocked.Exchange(ref closeCalled, 1);
            int rc = Native.tether_close(handle, timeoutMs);
            if (rc == (int)Status.Timeout) return false;
            Native.Check(rc, "tether_close");
            return true;
        }

        /// <summary>tether_free, after closing without waiting if Close was not called (so that a thread waiting in
        /// NextEvent(-1) sees the end and the handle can go).</summary>
        public void Dispose()
        {
            if (handle.IsClosed) return;
            if (Interlocked.Exchange(ref closeCalled, 1) == 0)
            {
                try { Native.tether_close(handle, 0); } catch (ObjectDisposedException) { }
            }
            handle.Dispose(); // frees once no call on the client is in progress (SafeHandle counts them)
        }
    }

    /// <summary>The wake-up callbacks: one static native thunk, kept alive for the process's life, and a table from
    /// each client's key (the `user` pointer, never dereferenced) to its callback, so a call that comes after the
    /// client is freed (the library may still be calling) finds nothing instead of a collected delegate.</summary>
    static class Wakeups
    {
        internal static readonly ConcurrentDictionary<long, Action> Table = new ConcurrentDictionary<long, Action>();
        static readonly Native.tether_wakeup_fn keepAlive = OnWakeup;
        internal static readonly IntPtr Thunk = Marshal.GetFunctionPointerForDelegate(keepAlive);
        static long next;

        internal static long NewKey() { return Interlocked.Increment(ref next); }

        [ThreadStatic] static bool released;
        [ThreadStatic] internal static bool Registering;

        // The first call on the library's thread (tether-io) attaches it to the runtime, and Mono waits at exit
        // (normal or Environment.Exit) for every attached thread to end, aborting background ones: tether-io never
        // does, so the process would hang. Mono skips the threads flagged MONO_THREAD_FLAG_DONT_MANAGE (1), which
        // it keeps in an internal field: set it there. Other runtimes (no such field) do not wait; nothing to do.
        static void Release()
        {
            released = true;
            try
            {
                const BindingFlags any = BindingFlags.NonPublic | BindingFlags.Instance;
                FieldInfo inner = typeof(Thread).GetField("internal_thread", any);
                object thread = inner == null ? null : inner.GetValue(Thread.CurrentThread);
                FieldInfo flags = thread == null ? null : thread.GetType().GetField("flags", any);
                if (flags != null && flags.FieldType == typeof(IntPtr))
                    flags.SetValue(thread, (IntPtr)((long)(IntPtr)flags.GetValue(thread) | 1));
            }
            catch (Exception) { } // not Mono, or a Mono laid out otherwise: at worst, the hang described above
        }

        static void OnWakeup(IntPtr user)
        {
            if (!released && !Registering) Release();
            Action cb;
            if (!Table.TryGetValue((long)user, out cb)) return;
            try { cb(); }
            catch (Exception e) { Console.Error.WriteLine("tether: the wake-up callback threw: " + e); }
        }
    }

    sealed class ConfigHandle : SafeHandle
    {
        public ConfigHandle() : base(IntPtr.Zero, true) { }
        public override bool IsInvalid { get { return handle == IntPtr.Zero; } }
        protected override bool ReleaseHandle() { Native.tether_config_free(handle); return true; }
    }

    sealed class ClientHandle : SafeHandle
    {
        internal readonly long Key = Wakeups.NewKey();
        public ClientHandle() : base(IntPtr.Zero, true) { }
        public override bool IsInvalid { get { return handle == IntPtr.Zero; } }

        protected override bool ReleaseHandle()
        {
            Action gone;
            Wakeups.Table.TryRemove(Key, out gone);
            Native.tether_set_wakeup_raw(handle, IntPtr.Zero, IntPtr.Zero);
            Native.tether_free(handle);
            return true;
        }
    }

    /// <summary>The C ABI, declared as in tether.h, and the marshalling by hand (strings are UTF-8 both ways).</summary>
    static class Native
    {
        const string Lib = "tether";

        [StructLayout(LayoutKind.Sequential)]
        internal struct tether_event
        {
            public int kind, flag, state;
            public uint attempt, heartbeat_ms, timeout_ms, retry_after_ms, delay_ms, silent_ms, last_seen_ms;
            public ulong epoch, seq, resent_as, count;
            public IntPtr server, peer, reason, alternative, text;
            public IntPtr data;
            public UIntPtr len;
            public IntPtr seqs;
            public UIntPtr nseqs;
        }

        [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
        internal delegate void tether_wakeup_fn(IntPtr user);

        [DllImport(Lib)] internal static extern int tether_client_start(ConfigHandle cfg, out ClientHandle client);
        [DllImport(Lib)] internal static extern int tether_send(ClientHandle client, byte[] to, IntPtr data, UIntPtr len, out ulong seq);
        [DllImport(Lib)] internal static extern int tether_subscribe(ClientHandle client, byte[] id);
        [DllImport(Lib)] internal static extern int tether_unsubscribe(ClientHandle client, byte[] id);
        [DllImport(Lib)] internal static extern int tether_set_wakeup(ClientHandle client, IntPtr cb, IntPtr user);
        [DllImport(Lib, EntryPoint = "tether_set_wakeup")] internal static extern int tether_set_wakeup_raw(IntPtr client, IntPtr cb, IntPtr user);
        [DllImport(Lib)] internal static extern int tether_close(ClientHandle client, uint timeoutMs);
        [DllImport(Lib)] internal static extern void tether_free(IntPtr client);
        [DllImport(Lib)] internal static extern int tether_config_new(byte[] clientId, out ConfigHandle cfg);
        [DllImport(Lib)] internal static extern void tether_config_free(IntPtr cfg);
        [DllImport(Lib)] internal static extern int tether_config_add_server(ConfigHandle cfg, byte[] hostPort);
        [DllImport(Lib)] internal static extern int tether_config_set_token(ConfigHandle cfg, byte[] token);
        [DllImport(Lib)] internal static extern int tether_config_set_heartbeat(ConfigHandle cfg, uint intervalMs);
        [DllImport(Lib)] internal static extern int tether_config_set_tls(ConfigHandle cfg, byte[] caFile, byte[] serverName);
        [DllImport(Lib)] internal static extern int tether_config_set_reconnect(ConfigHandle cfg, uint initialMs, uint maxMs, uint maxAttempts, uint returnToPrimaryMs);
        [DllImport(Lib)] internal static extern int tether_config_set_queues(ConfigHandle cfg, uint heldSends, uint maxEvents);
        [DllImport(Lib)] internal static extern int tether_config_set_reliable(ConfigHandle cfg, uint window, int receipts);
        [DllImport(Lib)] internal static extern int tether_config_set_adaptive_heartbeat(ConfigHandle cfg, uint floorMs, uint ceilingMs, uint marginPercent);
        [DllImport(Lib)] internal static extern int tether_next_event(IntPtr client, int timeoutMs, ref tether_event ev);
        // Strings the library hands out are its own: IntPtr, never `string` (the marshaller would free them).
        [DllImport(Lib)] internal static extern IntPtr tether_status_text(int status);
        [DllImport(Lib)] internal static extern IntPtr tether_version();
        [DllImport(Lib)] internal static extern IntPtr tether_last_error();

        /// <summary>UTF-8 that refuses lone surrogates rather than sending U+FFFD.</summary>
        internal static readonly Encoding Strict = new UTF8Encoding(false, true);

        static Native()
        {
            // The struct must match tether.h: ten 32-bit ints, four uint64, then pointers and size_t.
            int ptr = IntPtr.Size;
            if ((int)Marshal.OffsetOf(typeof(tether_event), "epoch") != 40
                || (int)Marshal.OffsetOf(typeof(tether_event), "server") != 72
                || (int)Marshal.OffsetOf(typeof(tether_event), "nseqs") != 72 + 8 * ptr)
                throw new PlatformNotSupportedException("tether_event's layout does not match tether.h here");
        }

        /// <summary>A NUL-terminated UTF-8 copy of s (null stays null, i.e. NULL).</summary>
        internal static byte[] ToUtf8(string s)
        {
            if (s == null) return null;
            if (s.IndexOf('\0') >= 0) throw new ArgumentException("a string for libtether may not contain NUL");
            var b = new byte[Strict.GetByteCount(s) + 1];
            Strict.GetBytes(s, 0, s.Length, b, 0);
            return b;
        }

        internal static string FromUtf8(IntPtr p)
        {
            if (p == IntPtr.Zero) return "";
            int n = 0;
            while (Marshal.ReadByte(p, n) != 0) n++;
            var b = new byte[n];
            Marshal.Copy(p, b, 0, n);
            return Encoding.UTF8.GetString(b);
        }

        internal static void Check(int rc, string operation)
        {
            if (rc >= 0) return;
            // Read the words at once, on this thread, before any other call can replace them.
            throw new TetherException(operation, (Status)rc, FromUtf8(tether_last_error()));
        }

        internal static TetherEvent Copy(ref tether_event e)
        {
            ulong len = e.len.ToUInt64(), nseqs = e.nseqs.ToUInt64();
            var data = new byte[e.data == IntPtr.Zero ? 0 : checked((int)len)];
            if (data.Length > 0) Marshal.Copy(e.data, data, 0, data.Length);
            var signed = new long[e.seqs == IntPtr.Zero ? 0 : checked((int)nseqs)];
            if (signed.Length > 0) Marshal.Copy(e.seqs, signed, 0, signed.Length);
            var seqs = new ulong[signed.Length];
            for (int i = 0; i < signed.Length; i++) seqs[i] = unchecked((ulong)signed[i]);
            return new TetherEvent
            {
                Kind = (EventKind)e.kind,
                Flag = e.flag != 0,
                State = (PresenceState)e.state,
                Attempt = e.attempt,
                HeartbeatMs = e.heartbeat_ms,
                TimeoutMs = e.timeout_ms,
                RetryAfterMs = e.retry_after_ms,
                DelayMs = e.delay_ms,
                SilentMs = e.silent_ms,
                LastSeenMs = e.last_seen_ms,
                Epoch = e.epoch,
                Seq = e.seq,
                ResentAs = e.resent_as,
                Count = e.count,
                Server = FromUtf8(e.server),
                Peer = FromUtf8(e.peer),
                Reason = FromUtf8(e.reason),
                Alternative = FromUtf8(e.alternative),
                Text = FromUtf8(e.text),
                Data = data,
                Length = len,
                Seqs = seqs,
            };
        }
    }
}
