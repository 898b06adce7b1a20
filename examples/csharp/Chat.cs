// Chat.cs: a console chat between two ids over tether, with presence (the C# twin of examples/c/chat.c):
//
//   mono chat.exe alice bob 127.0.0.1:7400 [backup:port ...]
//
// Each line typed is sent to the peer; what the peer says, whether it is online, and the state of the link are
// printed as they happen. Events are pulled on a thread of this program's own; the main thread reads stdin.
using System;
using System.Threading;
using Tether;

static class Chat
{
    static void PrintEvents(TetherClient client)
    {
        TetherEvent ev;
        while ((ev = client.NextEvent(-1)) != null) // null: closed, every event taken
        {
            switch (ev.Kind)
            {
                case EventKind.Connected: Console.WriteLine("* connected to {0}", ev.Server); break;
                case EventKind.ConnectFailed: Console.WriteLine("* could not connect to {0}: {1} (retrying)", ev.Server, ev.Text); break;
                case EventKind.GaveUp: Console.WriteLine("* gave up reconnecting: {0}", ev.Reason); break;
                case EventKind.Disconnected: Console.WriteLine("* disconnected from {0}: {1}", ev.Server, ev.Reason); break;
                case EventKind.Presence:
                    Console.WriteLine("* {0} is {1}{2}", ev.Peer, ev.State.ToString().ToLowerInvariant(),
                                      ev.Reason == "" ? "" : ": " + ev.Reason);
                    break;
                case EventKind.Data: Console.WriteLine("{0}> {1}", ev.Peer, ev.DataText); break;
                case EventKind.Undeliverable: Console.WriteLine("* not delivered to {0}: {1}", ev.Peer, ev.Reason); break;
            }
        }
    }

    static int Main(string[] args)
    {
        if (args.Length < 3)
        {
            Console.Error.WriteLine("usage: chat ME PEER HOST:PORT [BACKUP:PORT ...]");
            return 2;
        }
        TetherClient client;
        try
        {
            using (var cfg = new TetherConfig(args[0]))
            {
                for (int i = 2; i < args.Length; i++) cfg.AddServer(args[i]);
                client = TetherClient.Start(cfg);
            }
            client.Subscribe(args[1]);
        }
        catch (TetherException e)
        {
            Console.Error.WriteLine(e.Message);
            return 1;
        }
        using (client)
        {
            var events = new Thread(() => PrintEvents(client)) { Name = "tether events" };
            events.Start();
            string line;
            while ((line = Console.ReadLine()) != null)
            {
                try { client.Send(args[1], line); }
                catch (TetherException e) { Console.WriteLine("* not sent: {0}", e.Detail); }
            }
            client.Close(2000); // the event thread sees the end and returns
            events.Join();
        }
        return 0;
    }
}
