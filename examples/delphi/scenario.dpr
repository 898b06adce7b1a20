{ scenario.dpr: the libtether scenario in Delphi-mode Free Pascal (see scripts/test-clients), through the
  Tether unit's wrapper: alice and bob, each with a primary and a backup server, see each other, talk, survive
  the primary's SIGSTOP by failing over, and close cleanly. Exits 0 when every step held; otherwise prints the
  step that failed and exits 1. }
program scenario;

{$mode delphi}
{$H+}

uses
  cthreads, SysUtils, BaseUnix, Tether;

var
  Primary, Backup: UTF8String;

procedure Fail(const Msg: string);
begin
  Flush(Output);
  WriteLn(StdErr, 'delphi scenario FAILED: ', Msg);
  Halt(1);
end;

function NowMs: Int64;
begin
  Result := Int64(GetTickCount64);  { monotonic }
end;

function Start(const Id: UTF8String): TTetherClient;
var
  Config: TTetherConfig;
begin
  Config := TTetherConfig.Create(Id, [Primary, Backup], 500);
  try
    { Reconnect after 100 ms at first; stay on the backup once there. }
    Config.SetReconnect(100, 2000, 0, 0);
    Result := TTetherClient.Create(Config);
  finally
    Config.Free;
  end;
end;

{ Pull Who's events until one of Kind matches (Peer, Data and State, when given), within Ms. }
function WaitFor(Client: TTetherClient; const Who: string; Kind: Int32; const Peer, Data: UTF8String;
  State: Int32; Ms: Int64): TTetherEvent;
var
  Deadline, Left: Int64;
  Ev: TTetherEvent;
begin
  Deadline := NowMs + Ms;
  while True do
  begin
    Left := Deadline - NowMs;
    if Left <= 0 then
      Fail(Format('%s: no event of kind %d (peer %s) within %d ms', [Who, Kind, string(Peer), Ms]));
    if not Client.NextEvent(Int32(Left), Ev) then
    begin
      if Client.Ended then
        Fail(Who + ': the client ended while waiting');
      Continue;
    end;
    if Ev.Kind = TETHER_EVENT_DISCONNECTED then
      WriteLn(Who, ': disconnected from ', Ev.Server, ': ', Ev.Reason, ' (by server: ', Ev.Flag, ')');
    if Ev.Kind = TETHER_EVENT_CONNECTED then
      WriteLn(Who, ': connected to ', Ev.Server);
    if Ev.Kind <> Kind then
      Continue;
    if (Peer <> '') and (Ev.Peer <> Peer) then
      Continue;
    if (State <> 0) and (Ev.State <> State) then
      Continue;
    if (Data <> '') and (Ev.DataText <> Data) then
      Continue;
    Exit(Ev);
  end;
end;

procedure Talk(Alice, Bob: TTetherClient; const Round: string);
var
  A, B: UTF8String;
begin
  A := UTF8String('hello bob (' + Round + ')');
  B := UTF8String('hello alice (' + Round + ')');
  Alice.Send('bob', A);
  WaitFor(Bob, 'bob', TETHER_EVENT_DATA, 'alice', A, 0, 5000);
  Bob.Send('alice', B);
  WaitFor(Alice, 'alice', TETHER_EVENT_DATA, 'bob', B, 0, 5000);
  WriteLn('exchanged messages (', Round, ')');
end;

procedure CloseClient(C: TTetherClient; const Who: string);
var
  Ev: TTetherEvent;
  SawBye: Boolean;
  Status: Int32;
begin
  if not C.Close(3000) then
    Fail(Who + ': tether_close timed out');
  Status := TETHER_OK;
  try
    C.Close(3000);
  except
    on E: ETether do
      Status := E.Status;
  end;
  if Status <> TETHER_ERR_CLOSED then
    Fail(Who + ': a second close was not refused');
  Status := TETHER_OK;
  try
    C.Send('x', 'x');
  except
    on E: ETether do
      Status := E.Status;
  end;
  if Status <> TETHER_ERR_CLOSED then
    Fail(Who + ': send after close');
  SawBye := False;
  while C.NextEvent(3000, Ev) do
    if (Ev.Kind = TETHER_EVENT_DISCONNECTED) and (Ev.Reason = 'bye') then
      SawBye := True;
  if not C.Ended then
    Fail(Who + ': events did not end with TETHER_CLOSED');
  if not SawBye then
    Fail(Who + ': no disconnected(bye) after close');
  C.Free;
end;

procedure Run;
var
  Alice, Bob: TTetherClient;
  Ev: TTetherEvent;
  PidS: string;
  StoppedAt, Bound: Int64;
  TimeoutMs: UInt32;
begin
  Primary := UTF8String(GetEnvironmentVariable('TETHER_PRIMARY'));
  Backup := UTF8String(GetEnvironmentVariable('TETHER_BACKUP'));
  PidS := GetEnvironmentVariable('TETHER_PRIMARY_PID');
  if (Primary = '') or (Backup = '') or (PidS = '') then
    Fail('TETHER_PRIMARY, TETHER_BACKUP and TETHER_PRIMARY_PID must be set');
  WriteLn('libtether ', TetherVersion);

  { 1. Connect to the primary, with a backup configured. }
  Alice := Start('alice');
  Bob := Start('bob');
  Ev := WaitFor(Alice, 'alice', TETHER_EVENT_CONNECTED, '', '', 0, 5000);
  if (Ev.Server <> Primary) or (Ev.Flag <> 1) then
    Fail('alice connected to ' + string(Ev.Server) + ', not the primary');
  TimeoutMs := Ev.TimeoutMs;
  WaitFor(Bob, 'bob', TETHER_EVENT_CONNECTED, '', '', 0, 5000);

  { 2. Subscribe to the peer and see it online. }
  Alice.Subscribe('bob');
  WaitFor(Alice, 'alice', TETHER_EVENT_PRESENCE, 'bob', '', TETHER_ONLINE, 5000);
  WriteLn('alice sees bob online');

  { 3. Exchange messages. }
  Talk(Alice, Bob, 'primary');

  { 4. Stop the primary: the death is the client's heartbeat verdict, and both move to the backup. }
  if fpKill(StrToInt(PidS), SIGSTOP) <> 0 then
    Fail('SIGSTOP the primary');
  StoppedAt := NowMs;
  Bound := Int64(TimeoutMs) + 2000;
  Ev := WaitFor(Alice, 'alice', TETHER_EVENT_DISCONNECTED, '', '', 0, Bound);
  if (Ev.Reason <> 'heartbeat_timeout') or (Ev.Flag <> 0) or (Ev.Server <> Primary) then
    Fail(Format('alice: disconnected with %s (by server: %d) from %s',
      [string(Ev.Reason), Ev.Flag, string(Ev.Server)]));
  Ev := WaitFor(Alice, 'alice', TETHER_EVENT_CONNECTED, '', '', 0, Bound - (NowMs - StoppedAt));
  if (Ev.Server <> Backup) or (Ev.Flag <> 0) then
    Fail('alice reconnected to ' + string(Ev.Server) + ', not the backup');
  WriteLn('alice failed over to the backup ', NowMs - StoppedAt, ' ms after the SIGSTOP (bound ', Bound, ' ms)');
  WaitFor(Alice, 'alice', TETHER_EVENT_PRESENCE, 'bob', '', TETHER_ONLINE, 5000);
  WriteLn('alice sees bob online on the backup');
  Talk(Alice, Bob, 'backup');

  { 5. Close cleanly. }
  CloseClient(Alice, 'alice');
  CloseClient(Bob, 'bob');
  WriteLn('delphi scenario passed');
end;

begin
  try
    Run;
  except
    on E: Exception do
      Fail(E.ClassName + ': ' + E.Message);
  end;
end.
