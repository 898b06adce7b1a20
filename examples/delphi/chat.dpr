{ chat.dpr: a console chat between two ids over tether, with presence, in Delphi-mode Free Pascal:

    chat alice bob 127.0.0.1:7400 [backup:port ...]

  Each line typed is sent to the peer; what the peer says, whether it is online, and the state of the link are
  printed as they happen, from a TThread that pulls the events; the main thread reads stdin.
  Build: fpc -Mdelphi -Fu<this dir> -Fl<dir of libtether.so> chat.dpr }
program chat;

{$mode delphi}
{$H+}

uses
  cthreads, cwstring, Classes, SysUtils, Tether;

type
  TEventPrinter = class(TThread)
  private
    FClient: TTetherClient;
  protected
    procedure Execute; override;
  public
    constructor Create(Client: TTetherClient);
  end;

constructor TEventPrinter.Create(Client: TTetherClient);
begin
  FClient := Client;
  inherited Create(False);
end;

procedure TEventPrinter.Execute;
const
  States: array[TETHER_ONLINE..TETHER_OFFLINE] of string = ('online', 'suspect', 'offline');
var
  Ev: TTetherEvent;
  Why: string;
begin
  while FClient.NextEvent(-1, Ev) do  { False once the client is closed and drained }
  begin
    case Ev.Kind of
      TETHER_EVENT_CONNECTED:
        WriteLn('* connected to ', Ev.Server);
      TETHER_EVENT_DISCONNECTED:
        WriteLn('* disconnected from ', Ev.Server, ': ', Ev.Reason);
      TETHER_EVENT_CONNECT_FAILED:
        WriteLn('* could not connect to ', Ev.Server, ': ', Ev.Text, ' (retrying)');
      TETHER_EVENT_GAVE_UP:
        WriteLn('* gave up reconnecting: ', Ev.Reason);
      TETHER_EVENT_PRESENCE:
        begin
          Why := '';
          if Ev.Reason <> '' then
            Why := ': ' + string(Ev.Reason);
          if (Ev.State >= Low(States)) and (Ev.State <= High(States)) then
            WriteLn('* ', Ev.Peer, ' is ', States[Ev.State], Why);
        end;
      TETHER_EVENT_DATA:
        WriteLn(Ev.Peer, '> ', Ev.DataText);
      TETHER_EVENT_UNDELIVERABLE:
        WriteLn('* not delivered to ', Ev.Peer, ': ', Ev.Reason);
    end;
    Flush(Output);
  end;
end;

var
  Client: TTetherClient;
  Printer: TEventPrinter;
  Servers: array of UTF8String;
  Peer: UTF8String;
  Line: string;
  I: Integer;
begin
  if ParamCount < 3 then
  begin
    WriteLn(StdErr, 'usage: ', ParamStr(0), ' ME PEER HOST:PORT [BACKUP:PORT ...]');
    Halt(2);
  end;
  Peer := UTF8String(ParamStr(2));
  SetLength(Servers, ParamCount - 2);
  for I := 3 to ParamCount do
    Servers[I - 3] := UTF8String(ParamStr(I));
  try
    Client := TTetherClient.Create(UTF8String(ParamStr(1)), Servers);
  except
    on E: ETether do
    begin
      WriteLn(StdErr, E.Message);
      Halt(2);
    end;
  end;
  Client.Subscribe(Peer);
  Printer := TEventPrinter.Create(Client);
  while not Eof(Input) do
  begin
    ReadLn(Line);
    try
      Client.Send(Peer, UTF8String(Line));
    except
      on E: ETether do
        WriteLn('* not sent: ', E.Message);
    end;
  end;
  try
    Client.Close(2000);  { the printer sees the end and stops }
  except
    on E: ETether do
      WriteLn(StdErr, E.Message);  { it had given up already }
  end;
  Printer.WaitFor;
  Printer.Free;
  Client.Free;
end.
