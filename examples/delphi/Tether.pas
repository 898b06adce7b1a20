{ Tether.pas: libtether, the tether client's C ABI (crates/tether-ffi/tether.h), for Delphi-mode Free Pascal
  (fpc -Mdelphi).

  The first part translates the header one to one, under its C names: every constant, the tether_event record
  (C layout, checked at compile time) and every function, external 'tether' (link with -Fl<dir of libtether.so>).
  The second part is a thin Delphi-style wrapper over it:
    TTetherConfig  a client's settings (fluent: Cfg.AddServer(..).SetHeartbeat(..));
    TTetherClient  a running client: Send, Subscribe, Unsubscribe, NextEvent, Close; Free frees it;
    TTetherEvent   one event, every field copied out of the library's memory (UTF8String, TBytes, array);
    ETether        raised for every negative status, with Status and the tether_last_error() message.
  Strings go to the library as UTF-8. A program that uses clients from several threads puts cthreads first in
  its uses clause (and cwstring, for conversions between UTF8String and the console's code page). }
unit Tether;

{$mode delphi}
{$H+}
{$PACKRECORDS C}

interface

uses
  SysUtils;

const
  TetherLib = 'tether';

  { tether_event.kind }
  TETHER_EVENT_CONNECTED = 1;       { server, flag (1: primary), epoch, heartbeat_ms, timeout_ms, reason, count }
  TETHER_EVENT_DISCONNECTED = 2;    { server, reason, flag (1: by server), retry_after_ms, alternative, text }
  TETHER_EVENT_RECONNECTING = 3;    { server, attempt, delay_ms }
  TETHER_EVENT_CONNECT_FAILED = 4;  { server, text, reason, retry_after_ms }
  TETHER_EVENT_GAVE_UP = 5;         { attempt, reason }
  TETHER_EVENT_DATA = 6;            { peer, data/len }
  TETHER_EVENT_PRESENCE = 7;        { peer, state, reason, flag, last_seen_ms }
  TETHER_EVENT_UNDELIVERABLE = 8;   { peer, reason }
  TETHER_EVENT_NOT_SENT = 9;        { peer, len, text }
  TETHER_EVENT_SUSPECT = 10;        { silent_ms }
  TETHER_EVENT_RECOVERED = 11;
  TETHER_EVENT_ACKED = 12;          { seq }
  TETHER_EVENT_DELIVERED = 13;      { peer, seqs/nseqs }
  TETHER_EVENT_NOT_DELIVERED = 14;  { peer, seqs/nseqs, reason }
  TETHER_EVENT_IN_DOUBT = 15;       { peer, seq, data/len, flag, resent_as }
  TETHER_EVENT_DROPPED = 16;        { count }
  TETHER_EVENT_DIAGNOSIS = 17;      { reason (the diagnosis), text (its explanation) }
  TETHER_EVENT_HEARTBEAT = 18;      { heartbeat_ms, timeout_ms (the adaptive heartbeat's new interval) }

  { tether_event.state of TETHER_EVENT_PRESENCE }
  TETHER_ONLINE = 1;
  TETHER_SUSPECT = 2;
  TETHER_OFFLINE = 3;

  { Statuses: Int32 constants, never a Pascal enum (one byte in Delphi mode). }
  TETHER_OK = 0;
  TETHER_TIMEOUT = 1;
  TETHER_CLOSED = 2;
  TETHER_ERR_NULL = -1;
  TETHER_ERR_UTF8 = -2;
  TETHER_ERR_INVALID = -3;
  TETHER_ERR_TOO_LARGE = -4;
  TETHER_ERR_FULL = -5;
  TETHER_ERR_CLOSED = -6;
  TETHER_ERR_TLS = -7;
  TETHER_ERR_THREAD = -8;
  TETHER_ERR_INTERNAL = -9;

type
  { Opaque handles. }
  Ptether_client = type Pointer;
  Ptether_config = type Pointer;

  { Called on the library's own thread (not a Pascal thread): it must be cdecl, return quickly, not call into
    the library, and not use Pascal strings, exceptions or the heap (write to a pipe, post an eventfd). }
  tether_wakeup_fn = procedure(user: Pointer); cdecl;

  Ptether_event = ^tether_event;
  tether_event = record
    kind: Int32;
    flag: Int32;
    state: Int32;
    attempt: UInt32;
    heartbeat_ms: UInt32;
    timeout_ms: UInt32;
    retry_after_ms: UInt32;
    delay_ms: UInt32;
    silent_ms: UInt32;
    last_seen_ms: UInt32;
    epoch: UInt64;
    seq: UInt64;
    resent_as: UInt64;
    count: UInt64;
    server: PAnsiChar;
    peer: PAnsiChar;
    reason: PAnsiChar;
    alternative: PAnsiChar;
    text: PAnsiChar;
    data: PByte;
    len: NativeUInt;
    seqs: PUInt64;
    nseqs: NativeUInt;
  end;

{ The layout must be C's: ten 4-byte ints, four uint64, nine pointer-sized fields. }
{$if SizeOf(tether_event) <> 72 + 9 * SizeOf(Pointer)}
  {$error tether_event does not have the C layout}
{$endif}

function tether_client_start(cfg: Ptether_config; out client: Ptether_client): Int32; cdecl; external TetherLib;
function tether_send(client: Ptether_client; to_: PAnsiChar; data: PByte; len: NativeUInt; seq: PUInt64): Int32;
  cdecl; external TetherLib;
function tether_subscribe(client: Ptether_client; id: PAnsiChar): Int32; cdecl; external TetherLib;
function tether_unsubscribe(client: Ptether_client; id: PAnsiChar): Int32; cdecl; external TetherLib;
function tether_set_wakeup(client: Ptether_client; cb: tether_wakeup_fn; user: Pointer): Int32;
  cdecl; external TetherLib;
function tether_close(client: Ptether_client; timeout_ms: UInt32): Int32; cdecl; external TetherLib;
procedure tether_free(client: Ptether_client); cdecl; external TetherLib;
function tether_config_new(client_id: PAnsiChar; out cfg: Ptether_config): Int32; cdecl; external TetherLib;
procedure tether_config_free(cfg: Ptether_config); cdecl; external TetherLib;
function tether_config_add_server(cfg: Ptether_config; host_port: PAnsiChar): Int32; cdecl; external TetherLib;
function tether_config_set_token(cfg: Ptether_config; token: PAnsiChar): Int32; cdecl; external TetherLib;
function tether_config_set_heartbeat(cfg: Ptether_config; interval_ms: UInt32): Int32; cdecl; external TetherLib;
function tether_config_set_tls(cfg: Ptether_config; ca_file, server_name: PAnsiChar): Int32;
  cdecl; external TetherLib;
function tether_config_set_reconnect(cfg: Ptether_config; initial_ms, max_ms, max_attempts,
  return_to_primary_ms: UInt32): Int32; cdecl; external TetherLib;
function tether_config_set_queues(cfg: Ptether_config; held_sends, max_events: UInt32): Int32;
  cdecl; external TetherLib;
function tether_config_set_reliable(cfg: Ptether_config; window: UInt32; receipts: Int32): Int32;
  cdecl; external TetherLib;
function tether_config_set_adaptive_heartbeat(cfg: Ptether_config; floor_ms, ceiling_ms,
  margin_percent: UInt32): Int32; cdecl; external TetherLib;
function tether_next_event(client: Ptether_client; timeout_ms: Int32; event: Ptether_event): Int32;
  cdecl; external TetherLib;
function tether_status_text(status: Int32): PAnsiChar; cdecl; external TetherLib;
function tether_version: PAnsiChar; cdecl; external TetherLib;
function tether_last_error: PAnsiChar; cdecl; external TetherLib;

{ ---- The Delphi-style wrapper ---- }

type
  { A negative status: Status is the TETHER_ERR_* code, Message says what failed and tether_last_error(). }
  ETether = class(Exception)
  private
    FStatus: Int32;
  public
    constructor CreateStatus(AStatus: Int32; const What: string);
    property Status: Int32 read FStatus;
  end;

  TUInt64Array = array of UInt64;

  { One event, owned by the application. Which fields mean something depends on Kind (see TETHER_EVENT_*). }
  TTetherEvent = record
    Kind: Int32;
    Flag: Int32;
    State: Int32;
    Attempt: UInt32;
    HeartbeatMs: UInt32;
    TimeoutMs: UInt32;
    RetryAfterMs: UInt32;
    DelayMs: UInt32;
    SilentMs: UInt32;
    LastSeenMs: UInt32;
    Epoch: UInt64;
    Seq: UInt64;
    ResentAs: UInt64;
    Count: UInt64;
    Server: UTF8String;
    Peer: UTF8String;
    Reason: UTF8String;
    Alternative: UTF8String;
    Text: UTF8String;
    Data: TBytes;
    Len: NativeUInt;   { = Length(Data), except for TETHER_EVENT_NOT_SENT, which gives a length without data }
    Seqs: TUInt64Array;
    function DataText: UTF8String;  { Data as UTF-8 text }
    function KindName: string;      { 'connected', 'data', ... }
  end;

  { A client's settings. The client started from it keeps its own copy: free it whenever. }
  TTetherConfig = class
  private
    FHandle: Ptether_config;
  public
    constructor Create(const ClientId: UTF8String); overload;
    { The id, the servers (the first is the primary) and the heartbeat to ask for (0: the server's). }
    constructor Create(const ClientId: UTF8String; const Servers: array of UTF8String;
      HeartbeatMs: UInt32 = 0); overload;
    destructor Destroy; override;
    function AddServer(const HostPort: UTF8String): TTetherConfig;
    function SetToken(const Token: UTF8String): TTetherConfig;  { '': send none }
    function SetHeartbeat(IntervalMs: UInt32): TTetherConfig;
    { '' for CaFile trusts the system's store; '' for ServerName checks each server's host. }
    function SetTls(const CaFile: UTF8String = ''; const ServerName: UTF8String = ''): TTetherConfig;
    function SetReconnect(InitialMs, MaxMs, MaxAttempts, ReturnToPrimaryMs: UInt32): TTetherConfig;
    function SetQueues(HeldSends, MaxEvents: UInt32): TTetherConfig;
    function SetReliable(Window: UInt32 = 0; Receipts: Boolean = False): TTetherConfig;
    function SetAdaptiveHeartbeat(FloorMs, CeilingMs: UInt32; MarginPercent: UInt32 = 10): TTetherConfig;
    property Handle: Ptether_config read FHandle;
  end;

  { A running client: it connects and reconnects in the background. Free closes it without waiting (call
    Close first to wait for the goodbye). Send and Subscribe may be called from several threads; NextEvent
    from one thread at a time. }
  TTetherClient = class
  private
    FHandle: Ptether_client;
    FEnded: Boolean;
  public
    constructor Create(Config: TTetherConfig); overload;
    constructor Create(const ClientId: UTF8String; const Servers: array of UTF8String;
      HeartbeatMs: UInt32 = 0); overload;
    destructor Destroy; override;
    { Send to client ToId ('' : the server's application). Returns the sequence number on a reliable
      session, else 0. }
    function Send(const ToId: UTF8String; const Data: TBytes): UInt64; overload;
    function Send(const ToId: UTF8String; const Text: UTF8String): UInt64; overload;
    function Send(const ToId: UTF8String; Data: PByte; Len: NativeUInt): UInt64; overload;
    procedure Subscribe(const Id: UTF8String);    { '*': everyone, where the server allows it }
    procedure Unsubscribe(const Id: UTF8String);
    procedure SetWakeup(Callback: tether_wakeup_fn; User: Pointer);  { see tether_wakeup_fn }
    { Say goodbye and stop reconnecting: True when done within TimeoutMs, False when it goes on in the
      background. A second Close raises ETether (TETHER_ERR_CLOSED). }
    function Close(TimeoutMs: UInt32 = 3000): Boolean;
    { Wait up to TimeoutMs (0: poll, -1: for ever): True with an event; False on timeout, or once the client
      is closed and every event was taken (then Ended is True). }
    function NextEvent(TimeoutMs: Int32; out Ev: TTetherEvent): Boolean;
    property Ended: Boolean read FEnded;
    property Handle: Ptether_client read FHandle;
  end;

function TetherVersion: string;
function TetherStatusText(Status: Int32): string;
function TetherLastError: UTF8String;
{ Raise ETether when Status is negative; return it otherwise. }
function TetherCheck(Status: Int32; const What: string): Int32;

implementation

{ A NUL-terminated UTF-8 string of the library, copied byte for byte (no code page conversion). }
function CopyUtf8(P: PAnsiChar): UTF8String;
var
  N: SizeInt;
begin
  Result := '';
  if P = nil then
    Exit;
  N := StrLen(P);
  SetLength(Result, N);
  if N > 0 then
    Move(P^, Result[1], N);
end;

function OrNil(const S: UTF8String): PAnsiChar;
begin
  if S = '' then
    Result := nil
  else
    Result := PAnsiChar(S);
end;

function TetherVersion: string;
begin
  Result := string(CopyUtf8(tether_version));
end;

function TetherStatusText(Status: Int32): string;
begin
  Result := string(CopyUtf8(tether_status_text(Status)));
end;

function TetherLastError: UTF8String;
begin
  Result := CopyUtf8(tether_last_error);
end;

function TetherCheck(Status: Int32; const What: string): Int32;
begin
  if Status < 0 then
    raise ETether.CreateStatus(Status, What);
  Result := Status;
end;

{ ETether }

constructor ETether.CreateStatus(AStatus: Int32; const What: string);
begin
  { Read the message first: it is per thread and valid until the next failing call. }
  inherited CreateFmt('%s: %s (%s)', [What, TetherStatusText(AStatus), string(TetherLastError)]);
  FStatus := AStatus;
end;

{ TTetherEvent }

function TTetherEvent.DataText: UTF8String;
begin
  SetLength(Result, Length(Data));
  if Length(Data) > 0 then
    Move(Data[0], Result[1], Length(Data));
end;

function TTetherEvent.KindName: string;
const
  Names: array[TETHER_EVENT_CONNECTED..TETHER_EVENT_HEARTBEAT] of string = ('connected', 'disconnected',
    'reconnecting', 'connect_failed', 'gave_up', 'data', 'presence', 'undeliverable', 'not_sent', 'suspect',
    'recovered', 'acked', 'delivered', 'not_delivered', 'in_doubt', 'dropped', 'diagnosis', 'heartbeat');
begin
  if (Kind >= Low(Names)) and (Kind <= High(Names)) then
    Result := Names[Kind]
  else
    Result := 'kind ' + IntToStr(Kind);
end;

procedure CopyEvent(const Raw: tether_event; var Ev: TTetherEvent);
begin
  Ev.Kind := Raw.kind;
  Ev.Flag := Raw.flag;
  Ev.State := Raw.state;
  Ev.Attempt := Raw.attempt;
  Ev.HeartbeatMs := Raw.heartbeat_ms;
  Ev.TimeoutMs := Raw.timeout_ms;
  Ev.RetryAfterMs := Raw.retry_after_ms;
  Ev.DelayMs := Raw.delay_ms;
  Ev.SilentMs := Raw.silent_ms;
  Ev.LastSeenMs := Raw.last_seen_ms;
  Ev.Epoch := Raw.epoch;
  Ev.Seq := Raw.seq;
  Ev.ResentAs := Raw.resent_as;
  Ev.Count := Raw.count;
  Ev.Server := CopyUtf8(Raw.server);
  Ev.Peer := CopyUtf8(Raw.peer);
  Ev.Reason := CopyUtf8(Raw.reason);
  Ev.Alternative := CopyUtf8(Raw.alternative);
  Ev.Text := CopyUtf8(Raw.text);
  Ev.Len := Raw.len;
  Ev.Data := nil;
  if Raw.data <> nil then
  begin
    SetLength(Ev.Data, Raw.len);
    if Raw.len > 0 then
      Move(Raw.data^, Ev.Data[0], Raw.len);
  end;
  Ev.Seqs := nil;
  if Raw.seqs <> nil then
  begin
    SetLength(Ev.Seqs, Raw.nseqs);
    if Raw.nseqs > 0 then
      Move(Raw.seqs^, Ev.Seqs[0], Raw.nseqs * SizeOf(UInt64));
  end;
end;

{ TTetherConfig }

constructor TTetherConfig.Create(const ClientId: UTF8String);
begin
  inherited Create;
  TetherCheck(tether_config_new(PAnsiChar(ClientId), FHandle), 'tether_config_new');
end;

constructor TTetherConfig.Create(const ClientId: UTF8String; const Servers: array of UTF8String;
  HeartbeatMs: UInt32);
var
  S: UTF8String;
begin
  Create(ClientId);
  for S in Servers do
    AddServer(S);
  SetHeartbeat(HeartbeatMs);
end;

destructor TTetherConfig.Destroy;
begin
  tether_config_free(FHandle);  { NULL, when the constructor failed, does nothing }
  inherited;
end;

function TTetherConfig.AddServer(const HostPort: UTF8String): TTetherConfig;
begin
  TetherCheck(tether_config_add_server(FHandle, PAnsiChar(HostPort)), 'add server ' + string(HostPort));
  Result := Self;
end;

function TTetherConfig.SetToken(const Token: UTF8String): TTetherConfig;
begin
  TetherCheck(tether_config_set_token(FHandle, OrNil(Token)), 'tether_config_set_token');
  Result := Self;
end;

function TTetherConfig.SetHeartbeat(IntervalMs: UInt32): TTetherConfig;
begin
  TetherCheck(tether_config_set_heartbeat(FHandle, IntervalMs), 'tether_config_set_heartbeat');
  Result := Self;
end;

function TTetherConfig.SetTls(const CaFile, ServerName: UTF8String): TTetherConfig;
begin
  TetherCheck(tether_config_set_tls(FHandle, OrNil(CaFile), OrNil(ServerName)), 'tether_config_set_tls');
  Result := Self;
end;

function TTetherConfig.SetReconnect(InitialMs, MaxMs, MaxAttempts, ReturnToPrimaryMs: UInt32): TTetherConfig;
begin
  TetherCheck(tether_config_set_reconnect(FHandle, InitialMs, MaxMs, MaxAttempts, ReturnToPrimaryMs),
    'tether_config_set_reconnect');
  Result := Self;
end;

function TTetherConfig.SetQueues(HeldSends, MaxEvents: UInt32): TTetherConfig;
begin
  TetherCheck(tether_config_set_queues(FHandle, HeldSends, MaxEvents), 'tether_config_set_queues');
  Result := Self;
end;

function TTetherConfig.SetReliable(Window: UInt32; Receipts: Boolean): TTetherConfig;
begin
  TetherCheck(tether_config_set_reliable(FHandle, Window, Ord(Receipts)), 'tether_config_set_reliable');
  Result := Self;
end;

function TTetherConfig.SetAdaptiveHeartbeat(FloorMs, CeilingMs, MarginPercent: UInt32): TTetherConfig;
begin
  TetherCheck(tether_config_set_adaptive_heartbeat(FHandle, FloorMs, CeilingMs, MarginPercent),
    'tether_config_set_adaptive_heartbeat');
  Result := Self;
end;

{ TTetherClient }

constructor TTetherClient.Create(Config: TTetherConfig);
begin
  inherited Create;
  TetherCheck(tether_client_start(Config.Handle, FHandle), 'tether_client_start');
end;

constructor TTetherClient.Create(const ClientId: UTF8String; const Servers: array of UTF8String;
  HeartbeatMs: UInt32);
var
  Config: TTetherConfig;
begin
  Config := TTetherConfig.Create(ClientId, Servers, HeartbeatMs);
  try
    Create(Config);
  finally
    Config.Free;
  end;
end;

destructor TTetherClient.Destroy;
begin
  tether_free(FHandle);
  inherited;
end;

function TTetherClient.Send(const ToId: UTF8String; Data: PByte; Len: NativeUInt): UInt64;
begin
  Result := 0;
  TetherCheck(tether_send(FHandle, PAnsiChar(ToId), Data, Len, @Result), 'tether_send');
end;

function TTetherClient.Send(const ToId: UTF8String; const Data: TBytes): UInt64;
begin
  { A non-NULL pointer even for no bytes: NULL data is refused. }
  if Length(Data) = 0 then
    Result := Send(ToId, PByte(PAnsiChar('')), 0)
  else
    Result := Send(ToId, @Data[0], Length(Data));
end;

function TTetherClient.Send(const ToId: UTF8String; const Text: UTF8String): UInt64;
begin
  Result := Send(ToId, PByte(PAnsiChar(Text)), Length(Text));
end;

procedure TTetherClient.Subscribe(const Id: UTF8String);
begin
  TetherCheck(tether_subscribe(FHandle, PAnsiChar(Id)), 'tether_subscribe');
end;

procedure TTetherClient.Unsubscribe(const Id: UTF8String);
begin
  TetherCheck(tether_unsubscribe(FHandle, PAnsiChar(Id)), 'tether_unsubscribe');
end;

procedure TTetherClient.SetWakeup(Callback: tether_wakeup_fn; User: Pointer);
begin
  TetherCheck(tether_set_wakeup(FHandle, Callback, User), 'tether_set_wakeup');
end;

function TTetherClient.Close(TimeoutMs: UInt32): Boolean;
begin
  Result := TetherCheck(tether_close(FHandle, TimeoutMs), 'tether_close') = TETHER_OK;
end;

function TTetherClient.NextEvent(TimeoutMs: Int32; out Ev: TTetherEvent): Boolean;
var
  Raw: tether_event;
  Rc: Int32;
begin
  Ev := Default(TTetherEvent);
  Rc := TetherCheck(tether_next_event(FHandle, TimeoutMs, @Raw), 'tether_next_event');
  Result := Rc = TETHER_OK;
  if Result then
    CopyEvent(Raw, Ev)
  else if Rc = TETHER_CLOSED then
    FEnded := True;
end;

end.
